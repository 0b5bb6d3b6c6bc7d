"""The per-I/O cost meter (`make cost`, `python3 -m nvdp.cost`).

The same I/O workload is driven at each device configuration through qtest
(tests/cost/cost.c: the libqos nvme driver with shadow doorbells and
Linux's eventidx rule, or MMIO-only doorbells where the controller has no
Doorbell Buffer Config; a virtio-blk driver with VIRTIO_RING_F_EVENT_IDX),
on a null-co backend, in four phases: 4k reads and writes at QD 1 and
QD 32 (batches of 32).  No guest, no vCPU, no timing in the numbers:

  instructions per I/O   valgrind --tool=callgrind, one file per thread,
      cut at the phase boundaries (the workload runs
      "callgrind_control --dump" there, with the device idle), so
      start-up and warm-up are not in them.  Counted:
        main   inclusive cost of the main loop's AioContext dispatch
               (aio_ctx_dispatch: BHs, ioeventfd and completion handlers)
               plus the MMIO accesses the qtest client makes (calls from
               flatview_* into memory_region_dispatch_*: what a vCPU runs
               for a doorbell exit); not the qtest protocol's parsing, the
               client's guest-memory reads and writes, or glib's loop
        io     everything the IOThread executes
        other  worker and RCU threads (everything)
  interrupts per I/O     calls to msix_notify() (callgrind call counts)
  eventfd signals per I/O  calls to event_notifier_set(): ioeventfd
      doorbells (under qtest the MMIO write signals it; under KVM the kernel
      does), irqfds, aio_notify() wake-ups
  MMIO doorbells per I/O the client's doorbell/notify register writes (each
      one a VM exit under KVM); shadow doorbell writes are plain RAM writes
  syscalls per I/O       strace -f, by thread and kind, inside the phase's
      time window; socket I/O (the qtest and QMP protocols) left out.  The
      IOThread's (and any worker's) are the device's alone.  The main
      thread's are shown apart: every qtest command is one more main-loop
      iteration there (a ppoll, eventfd reads and writes), which a vCPU's
      MMIO exit would not cost; under KVM the ioeventfd and irqfd
      signalling that qtest routes through the main thread is the kernel's

Each configuration runs twice under callgrind: the instruction counts of
the two runs are shown side by side (a polling IOThread spends
instructions by wall time, so its count is not repeatable; its spread is
shown instead).

Output: build/cost/<stamp>/ (raw callgrind parts, strace logs, the
workload's stdout), build/cost/results.md and results.json.
"""
import argparse
import collections
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

from . import ROOT, configs

TREE = os.path.join(ROOT, "build", "qemu")
COST_DIR = os.path.join(ROOT, "build", "cost")
CLIENT = os.path.join(COST_DIR, "cost")
SRC = os.path.join(ROOT, "tests", "cost", "cost.c")
PHASES = ["read-qd1", "read-qd32", "write-qd1", "write-qd32"]
DEFAULT_CONFIGS = ["stock-nvme", "nvme", "nvme-iothread", "nvme-iothread-dbcs-off",
                   "nvme-iothread-poll", "virtio-blk", "virtio-blk-iothread"]
DEVFN = {"nvme": "04.0", "virtio-blk": "05.0"}


def log(msg):
    print(f"cost: {msg}", flush=True)


# ---- building the workload against the built tree -------------------------

def build_client():
    """Compile tests/cost/cost.c like nvme-io-test, link it with its objects."""
    bdir = os.path.join(TREE, "build")
    cc = json.load(open(os.path.join(bdir, "compile_commands.json")))
    entry = next(e for e in cc if e["file"].endswith("tests/qtest/nvme-io-test.c"))
    ninja = open(os.path.join(bdir, "build.ninja")).read()
    m = re.search(r"^build tests/qtest/nvme-io-test: c_LINKER (.*?)(?: \|.*)?\n"
                  r"((?: [A-Z_]+ = .*\n)*)", ninja, re.M)
    if not m:
        raise SystemExit("cost: no link rule for tests/qtest/nvme-io-test in build.ninja")
    objs = [o for o in m.group(1).split() if not o.endswith("nvme-io-test.c.o")]
    link_args = re.search(r" LINK_ARGS = (.*)", m.group(2)).group(1)
    inputs = [SRC] + [os.path.join(bdir, o) for o in objs]
    if os.path.exists(CLIENT) and all(os.path.getmtime(CLIENT) > os.path.getmtime(i)
                                      for i in inputs if os.path.exists(i)):
        return
    os.makedirs(COST_DIR, exist_ok=True)
    args = shlex.split(entry["command"])
    # drop the output and input of the original command
    out = []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a in ("-o", "-MF", "-MQ", "-c"):
            skip = a != "-c"
            continue
        if a == "-MD" or a.endswith("nvme-io-test.c"):
            continue
        out.append(a)
    obj = os.path.join(COST_DIR, "cost.o")
    log("building the workload (tests/cost/cost.c)")
    subprocess.run(out + ["-c", SRC, "-o", obj], cwd=bdir, check=True)
    subprocess.run([args[0], "-o", CLIENT, obj] + objs + shlex.split(link_args),
                   cwd=bdir, check=True)


# ---- running ----------------------------------------------------------------

BACKEND = "null"
IMAGE = os.path.join(COST_DIR, "disk.img")


def qemu_args(cfg):
    if BACKEND != "null" and not os.path.exists(IMAGE):
        subprocess.run(["fallocate", "-l", "1G", IMAGE], check=True)
    args = cfg.qemu_args(backend=BACKEND, image=IMAGE)
    i = args.index("-device") + 1
    args[i] += ",addr=" + DEVFN[cfg.kind]
    args = [a.replace("size=1G", "size=1073741824") for a in args]
    return args + ["-name", "cost,debug-threads=on"]


def qemu_binary(cfg):
    """The configuration's QEMU; for a before/after comparison, set
    NVDP_QEMU_BEFORE and add the "<name>-before" twins (nvdp/configs.py)."""
    return os.path.join(ROOT, configs.QEMU_BINARIES[cfg.qemu])


def run_client(cfg, wrapper, outdir, tag, n, warmup, boundary=""):
    qemu = qemu_binary(cfg)
    env = dict(os.environ, QTEST_QEMU_BINARY=" ".join(wrapper + [qemu]),
               COST_BOUNDARY=boundary)
    cmd = [CLIENT, "-d", cfg.kind, "-n", str(n), "-w", str(warmup), "--"] + qemu_args(cfg)
    t = time.time()
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=3600)
    open(os.path.join(outdir, f"{tag}.out"), "w").write(
        " ".join(shlex.quote(c) for c in cmd) + "\n" + p.stdout)
    if p.returncode:
        raise RuntimeError(f"{tag}: workload failed ({p.returncode}):\n{p.stdout[-3000:]}")
    log(f"{tag}: {time.time() - t:.0f} s")
    res = {"phases": {}, "counts": collections.defaultdict(dict), "setup": ""}
    for line in p.stdout.splitlines():
        w = line.split()
        if w[:1] == ["PHASE"]:
            res["phases"][w[1]] = (int(w[2]) / 1e6, int(w[3]) / 1e6)
        elif w[:1] == ["COUNT"]:
            res["counts"][w[1]][w[2]] = int(w[3])
        elif w[:1] == ["PID"]:
            res["pid"] = int(w[1])
        elif w[:1] == ["SETUP"]:
            res["setup"] = " ".join(w[1:])
    return res


def parse_callgrind(path):
    """Call edges (inclusive cost, count), self cost of libc's mem*, total."""
    names = {}
    fn = cfn = None
    in_call = False
    edges = collections.defaultdict(lambda: [0, 0])
    total = 0
    mem = 0

    def name(s):
        s = s.strip()
        m = re.match(r"\((\d+)\)(?: (.*))?$", s)
        if not m:
            return s
        if m.group(2) is not None:
            names[m.group(1)] = m.group(2)
        return names[m.group(1)]

    with open(path) as f:
        for line in f:
            c = line[:1]
            if c.isdigit() or c in "+-*":
                w = line.split()
                if in_call:
                    edges[(fn, cfn)][0] += int(w[1]) if len(w) > 1 else 0
                    in_call = False
                elif len(w) > 1 and MEM_RE.match(fn):
                    mem += int(w[1])
            elif line.startswith("fn="):
                fn = name(line[3:])
            elif line.startswith("cfn="):
                cfn = name(line[4:])
            elif line.startswith("calls="):
                edges[(fn, cfn)][1] += int(line[6:].split()[0])
                in_call = True
            elif line.startswith("totals:") or line.startswith("summary:"):
                total = int(line.split()[1])
    return edges, total, mem


# libc's string functions: valgrind counts each iteration of a rep-string
# instruction (rep stosb/movsb, which glibc uses above ~2 KiB) as one
# instruction, so a 16 KiB memset counts as 16,400
MEM_RE = re.compile(r"__(memset|memcpy|memmove|mempcpy)_")


def base(fn):
    return fn.split("'")[0]


def thread_kind(path, edges):
    """Thread 1 is the main thread; an IOThread runs iothread_run()."""
    if path.endswith("-01"):
        return "main"
    fns = {base(a) for a, _ in edges} | {base(b) for _, b in edges}
    if "iothread_run" in fns:
        return "io"
    if fns & {"dummy_cpu_thread_fn", "qemu_dummy_cpu_thread_fn"}:
        return "vcpu"
    return "other"


def part_cost(files):
    """{kind: instructions}, call counts of interest, for one dump part."""
    cost = collections.Counter()
    calls = collections.Counter()
    for path in files:
        edges, total, mem = parse_callgrind(path)
        kind = thread_kind(path, edges)
        if kind == "main":
            ins = 0
            for (a, b), (c, _) in edges.items():
                if base(b) == "aio_ctx_dispatch" and base(a) != "aio_ctx_dispatch":
                    ins += c
                elif base(b) in ("memory_region_dispatch_write",
                                 "memory_region_dispatch_read") and \
                        base(a).startswith("flatview_"):
                    ins += c
            cost["main"] += ins
        elif kind in ("io", "other"):
            cost[kind] += total
            cost["mem"] += mem
        for (a, b), (_, n) in edges.items():
            if base(b) in ("msix_notify", "event_notifier_set") and base(a) != base(b):
                calls[base(b)] += n
    return cost, calls


def run_callgrind(cfg, outdir, tag, n, warmup):
    cgdir = os.path.join(outdir, tag)
    os.makedirs(cgdir, exist_ok=True)
    wrapper = ["valgrind", "--tool=callgrind", "--separate-threads=yes",
               "--dump-instr=no", "--collect-jumps=no",
               f"--callgrind-out-file={cgdir}/cg.%p", "--log-file=" + cgdir + "/vg.log"]
    res = run_client(cfg, wrapper, outdir, tag, n, warmup,
                     boundary="callgrind_control --dump=")
    parts = collections.defaultdict(list)
    for path in glob.glob(f"{cgdir}/cg.*"):
        m = re.search(r"\.(\d+)-(\d+)$", path)
        if m:
            parts[int(m.group(1))].append(path)
    # which dump ended where: its "desc: Trigger: Client Request: end-NAME"
    ends = {}
    for p, files in parts.items():
        with open(files[0]) as f:
            for line in f:
                if line.startswith("desc: Trigger:"):
                    m = re.search(r"end-(\S+)", line)
                    if m:
                        ends[m.group(1)] = p
                    break
    out = {}
    for ph in PHASES:
        if ph not in ends:
            raise RuntimeError(f"{tag}: no callgrind dump for the end of {ph}")
        cost, calls = part_cost(parts[ends[ph]])
        ios = res["counts"][ph]["ios"]
        out[ph] = {"instr": {k: v / ios for k, v in cost.items()},
                   "instr_total": (cost["main"] + cost["io"] + cost["other"]) / ios,
                   "irqs": calls["msix_notify"] / ios,
                   "eventfd": calls["event_notifier_set"] / ios,
                   "mmio_db": res["counts"][ph]["mmio_doorbells"] / ios,
                   "shadow_db": res["counts"][ph]["shadow_doorbells"] / ios}
    return out, res["setup"]


STRACE_RE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(?:<\.\.\. (\w+) resumed>|(\w+)\((.*))")


def run_strace(cfg, outdir, tag, n, warmup):
    log_path = os.path.join(outdir, f"{tag}.strace")
    wrapper = ["strace", "-f", "-qq", "-ttt", "-y", "-o", log_path]
    res = run_client(cfg, wrapper, outdir, tag, n, warmup)
    names = {}
    first = None
    events = []
    with open(log_path) as f:
        for line in f:
            m = STRACE_RE.match(line)
            if not m or m.group(3):
                continue
            tid, ts, sc, args = int(m.group(1)), float(m.group(2)), m.group(4), m.group(5)
            if first is None:
                first = tid
            if sc == "prctl" and "PR_SET_NAME" in args:
                names[tid] = re.search(r'"([^"]*)"', args).group(1)
            # socket I/O: the qtest and QMP protocols
            if re.match(r"\d+<(socket|UNIX|TCP)", args):
                continue
            events.append((tid, ts, sc))
    out = {}
    for ph in PHASES:
        t0, t1 = res["phases"][ph]
        ios = res["counts"][ph]["ios"]
        by = collections.Counter()
        for tid, ts, sc in events:
            if t0 <= ts <= t1:
                who = "main" if tid == first else \
                    ("io" if names.get(tid, "").startswith("IO ") else "other")
                by[(who, sc)] += 1
        out[ph] = {"syscalls": sum(v for (who, sc), v in by.items() if who != "main") / ios,
                   "main": sum(v for (who, sc), v in by.items() if who == "main") / ios,
                   "by": {f"{w}:{s}": v / ios for (w, s), v in sorted(by.items())}}
    return out


# ---- report -----------------------------------------------------------------

def fmt(v, nd=0):
    return f"{v:,.{nd}f}" if v is not None else "-"


def report(results, meta):
    L = [f"# cost meter ({meta['date']}, {meta['host']}, {meta['qemu']})", "",
         f"N = {meta['n']} I/Os per phase after {meta['warmup']} warm-up, "
         f"{meta.get('backend', 'null')} backend, 4k, qtest (no guest).  Instructions: callgrind, two runs "
         "(run 1 / run 2; main = main-loop dispatch + MMIO accesses, io = "
         "IOThread; mem* = what of io and other is libc's memset/memcpy, "
         "whose rep-string loops valgrind counts one instruction per "
         "iteration, i.e. per byte).  Syscalls: strace, socket I/O left out; "
         "syscalls = IOThread and workers (the device's alone); main thread "
         "apart (it also runs the qtest protocol's loop: one ppoll and a few "
         "eventfd reads/writes per qtest command).  Per I/O.", ""]
    for ph in PHASES:
        L += [f"## {ph}", "",
              "| config | instructions (run 1 / run 2) | main | io | other | mem* | "
              "without mem* | syscalls | main thread syscalls | MMIO doorbells | "
              "shadow db writes | interrupts | eventfd signals |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in results.items():
            if "error" in r:
                L.append(f"| {name} | failed: {r['error'][:80]} | | | | | | | | | | | |")
                continue
            a, b = r["cg"][0][ph], r["cg"][1][ph]
            s = r["strace"][ph]
            spread = abs(a["instr_total"] - b["instr_total"]) / max(a["instr_total"], 1) * 100
            L.append(
                f"| {name} | {fmt(a['instr_total'])} / {fmt(b['instr_total'])} "
                f"({spread:.1f} %) | {fmt(a['instr'].get('main', 0))} | "
                f"{fmt(a['instr'].get('io', 0))} | {fmt(a['instr'].get('other', 0))} | "
                f"{fmt(a['instr'].get('mem', 0))} | "
                f"{fmt(a['instr_total'] - a['instr'].get('mem', 0))} | "
                f"{fmt(s['syscalls'], 2)} | {fmt(s['main'], 2)} | "
                f"{fmt(a['mmio_db'], 3)} | {fmt(a['shadow_db'], 3)} | "
                f"{fmt(a['irqs'], 3)} | {fmt(a['eventfd'], 2)} |")
        L.append("")
    L += ["Syscalls by thread and kind (per I/O, first phase of each table "
          "above; main = main thread, io = IOThread):", ""]
    for name, r in results.items():
        if "error" in r:
            continue
        for ph in PHASES:
            by = ", ".join(f"{k} {v:.2f}" for k, v in r["strace"][ph]["by"].items() if v >= 0.01)
            L.append(f"- {name} {ph}: {by}")
    return "\n".join(L) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", help="comma-separated names (nvdp/configs.py); "
                    f"default {','.join(DEFAULT_CONFIGS)}")
    ap.add_argument("-n", type=int, default=512, help="I/Os per phase (multiple of 32)")
    ap.add_argument("--warmup", type=int, default=128)
    ap.add_argument("--runs", type=int, default=2, choices=(1, 2),
                    help="callgrind runs per configuration")
    ap.add_argument("--no-strace", action="store_true")
    ap.add_argument("--backend", default="null", choices=sorted(configs.BACKENDS),
                    help="the disk's backend (default null: null-co); native and "
                    "io_uring use a 1 GiB raw image in build/cost, O_DIRECT")
    ap.add_argument("--out", help="write results.md/json here too (default build/cost)")
    a = ap.parse_args()
    global BACKEND
    BACKEND = a.backend
    for tool in ("valgrind", "strace"):
        if not shutil.which(tool):
            raise SystemExit(f"cost: {tool} is missing (apt-get install {tool})")
    names = a.configs.split(",") if a.configs else DEFAULT_CONFIGS
    cfgs = [configs.BY_NAME[n] for n in names]
    build_client()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    outdir = os.path.join(COST_DIR, stamp)
    os.makedirs(outdir)
    meta = {"date": time.strftime("%Y-%m-%d"), "host": os.uname().nodename,
            "n": a.n, "warmup": a.warmup, "configs": names, "backend": a.backend,
            "qemu": configs.QEMU_BINARIES["patched"]}
    results = {}
    for cfg in cfgs:
        qemu = qemu_binary(cfg)
        if not os.path.exists(qemu):
            log(f"{cfg.name}: skipped, {qemu} not built (make stock)")
            results[cfg.name] = {"error": f"{configs.QEMU_BINARIES[cfg.qemu]} not built"}
            continue
        try:
            r = {"cg": []}
            for i in range(a.runs):
                cg, setup = run_callgrind(cfg, outdir, f"{cfg.name}.cg{i + 1}", a.n, a.warmup)
                r["cg"].append(cg)
                r["setup"] = setup
            if a.runs == 1:
                r["cg"].append(r["cg"][0])
            r["strace"] = {ph: {"syscalls": None, "main": None, "by": {}}
                           for ph in PHASES} if a.no_strace else \
                run_strace(cfg, outdir, f"{cfg.name}.strace", a.n, a.warmup)
            results[cfg.name] = r
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            log(f"{cfg.name}: {e}")
            results[cfg.name] = {"error": str(e).splitlines()[0]}
    json.dump({"meta": meta, "results": results},
              open(os.path.join(outdir, "results.json"), "w"), indent=1)
    md = report(results, meta)
    open(os.path.join(outdir, "results.md"), "w").write(md)
    for d in [COST_DIR] + ([a.out] if a.out else []):
        os.makedirs(d, exist_ok=True)
        shutil.copy(os.path.join(outdir, "results.json"), os.path.join(d, "results.json"))
        shutil.copy(os.path.join(outdir, "results.md"), os.path.join(d, "results.md"))
    print(md)
    if any("error" in r for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
