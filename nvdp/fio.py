"""fio in the guest: command lines, job-script pieces, THE parser of its json."""
import json


def cmdline(name, dev, rw, qd, **opts):
    """fio arguments for 4k libaio direct I/O on DEV; OPTS as --key=value,
    True as a bare --key, None left out (later keys override earlier ones)."""
    o = dict(name=name, filename=dev, direct=1, ioengine="libaio", rw=rw, bs="4k", iodepth=qd)
    o.update(opts)
    return " ".join(f"--{k}" if v is True else f"--{k}={v}" for k, v in o.items() if v is not None)


def wait_dev(dev):
    """Job-script start: strict shell, DEV present (exit 3 otherwise)."""
    return ["set -u", f"nvdp_wait_dev {dev} 60 || {{ nvdp_log 'no {dev}'; exit 3; }}"]


def parse(text):
    """fio's json output (after any leading noise) summed over its jobs:
    iops, ios, lat_mean_us, lat_p50_us, lat_p99_us (for mixed I/O the larger
    of the read and write percentiles), error (or of the jobs'), read_bytes,
    write_bytes.  None if there is no fio json."""
    try:
        jobs = json.loads(text[text.index("{"):])["jobs"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not jobs:
        return None
    s = dict(iops=0.0, ios=0, lat_mean_us=None, lat_p50_us=0.0, lat_p99_us=0.0, error=0,
             read_bytes=0, write_bytes=0)
    mean_ns = 0.0
    for job in jobs:
        s["error"] |= job.get("error", 0)
        for d in ("read", "write"):
            st = job.get(d, {})
            s[d + "_bytes"] += st.get("io_bytes", 0)
            n = st.get("total_ios", 0)
            if not n:
                continue
            s["iops"] += st.get("iops", 0.0)
            s["ios"] += n
            clat = st.get("clat_ns", {})
            mean_ns += clat.get("mean", 0.0) * n
            pct = clat.get("percentile", {})
            s["lat_p50_us"] = max(s["lat_p50_us"], pct.get("50.000000", 0) / 1000.0)
            s["lat_p99_us"] = max(s["lat_p99_us"], pct.get("99.000000", 0) / 1000.0)
    if s["ios"]:
        s["lat_mean_us"] = mean_ns / s["ios"] / 1000.0
    return s


def verify_check(text, rc, size, verify_only=False):
    """(passed, diagnosis) for a verify run whose json is TEXT and exit
    status RC, that must write and read back exactly SIZE bytes.  With
    VERIFY_ONLY (a verify pass over what an earlier run wrote) fio counts
    the writes it skips as written, or not: 0 or SIZE."""
    if text is None:
        return False, "no fio output (missing result)"
    f = parse(text)
    if f is None:
        return False, f"unparsable fio json: {text[:300]}"
    w, r, err = f["write_bytes"], f["read_bytes"], f["error"]
    d = f"rc={rc} error={err} written={w} read={r} expected={size}"
    wrote = w in (0, size) if verify_only else w == size
    return (rc == 0 and err == 0 and r == size and wrote), d
