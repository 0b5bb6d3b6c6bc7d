#!/usr/bin/python3
"""Check the libvirt examples against the patched QEMU (`make check`).

For each examples/libvirt/*.xml, starts QEMU (QEMUMachine, -S) with what
libvirt would give it for the example's nvme controller, without libvirt:
  - an -object iothread,id=iothreadN per <iothreadids> entry, with its
    <poll> settings (libvirt's names for its IOThreads);
  - the managed form (nvme-iothread.xml): each <disk> with a
    <qemu:override> that sets the device's driver, as libvirt emits it: a
    -blockdev named like libvirt's, -device with the disk's alias, drive,
    serial and iothread='N' as "iothreadN", the override's properties on
    top (tests/libvirt/run.py checks the same XML against a real libvirtd);
  - the <qemu:commandline> form (nvme-iothreads2.xml): its arguments, the
    image replaced by a scratch file.
Then asks over QMP whether every nvme controller came up in the IOThread(s)
the XML names (qom-get iothread / iothread-queue-mapping) and whether the
IOThreads have the <poll> settings, and quits.  Prints TAP; exit status 1
on failure.

    PYTHONPATH=.:build/qemu/python python3 examples/libvirt/check.py [QEMU]
"""
import glob
import json
import os
import sys
import tempfile
import xml.etree.ElementTree as ET

from qemu.machine import QEMUMachine

from nvdp import ROOT
from nvdp.tap import Tap

QNS = "{http://libvirt.org/schemas/domain/qemu/1.0}"
POLL = {"max": "poll-max-ns", "grow": "poll-grow", "shrink": "poll-shrink"}


def iothreads(dom):
    """{"iothreadN": {QEMU property: value}} of <iothreadids>."""
    out = {}
    for it in dom.iterfind("iothreadids/iothread"):
        poll = it.find("poll")
        out[f"iothread{it.get('id')}"] = {
            POLL[k]: int(v) for k, v in (poll.attrib.items() if poll is not None else ())
            if k in POLL}
    return out


def override_value(p):
    t, v = p.get("type"), p.get("value")
    return {"signed": int, "unsigned": int,
            "bool": lambda s: s in ("true", "on", "yes")}.get(t, str)(v)


def managed_devices(dom, img):
    """(-blockdev/-device arguments, {device id: expected iothread}) for the
    <disk>s whose device a <qemu:override> turns into another driver."""
    overrides = {d.get("alias"): d.findall(f"{QNS}frontend/{QNS}property")
                 for d in dom.iter(f"{QNS}device")}
    args, want = [], {}
    for n, disk in enumerate(dom.iterfind("devices/disk"), 1):
        alias = disk.find("alias").get("name") if disk.find("alias") is not None else None
        if alias not in overrides:
            continue
        node = f"libvirt-{n}-storage"
        # cache.direct=on needs O_DIRECT, which tmpfs lacks: no cache/aio here
        args += ["-blockdev", json.dumps({"driver": "file", "filename": img,
                                          "node-name": node})]
        dev = {"driver": "virtio-blk-pci", "id": alias, "drive": node, "bus": "pcie.0"}
        drv = disk.find("driver")
        if drv is not None and drv.get("iothread"):
            dev["iothread"] = f"iothread{drv.get('iothread')}"
        if disk.findtext("serial"):
            dev["serial"] = disk.findtext("serial")
        for p in overrides[alias]:
            if p.get("type") == "remove":
                dev.pop(p.get("name"), None)
            else:
                dev[p.get("name")] = override_value(p)
        args += ["-device", json.dumps(dev)]
        want[alias] = ("iothread", f"/objects/{dev.get('iothread')}")
    return args, want


def commandline_devices(dom, img):
    args = [a.get("value").replace("/var/lib/libvirt/images/nvme0.raw", img)
            .replace('"cache":{"direct":true}', '"cache":{"direct":false}')
            .replace('"aio":"native"', '"aio":"threads"') for a in dom.iter(QNS + "arg")]
    want = {}
    for a in args:
        if a.startswith("{") and '"nvme"' in a:
            d = json.loads(a)
            if "iothread-queue-mapping" in d:
                want[d["id"]] = ("iothread-queue-mapping", d["iothread-queue-mapping"])
            elif "iothread" in d:
                want[d["id"]] = ("iothread", f"/objects/{d['iothread']}")
    return args, want


def check(t, qemu, path, tmp):
    name = os.path.basename(path)
    dom = ET.parse(path).getroot()
    img = os.path.join(tmp, "nvme0.raw")
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    threads = iothreads(dom)
    args = [a for tid, props in threads.items() for a in
            ("-object", json.dumps({"qom-type": "iothread", "id": tid, **props}))]
    margs, want = managed_devices(dom, img)
    cargs, cwant = commandline_devices(dom, img)
    want.update(cwant)
    vm = QEMUMachine(qemu, ["-machine", "q35", "-accel", "tcg", "-nodefaults", "-S"]
                     + args + margs + cargs, base_temp_dir=tmp)
    got, err = {}, None
    try:
        vm.launch()
        for dev_id, (prop, _) in want.items():
            got[dev_id] = vm.cmd("qom-get", path=f"/machine/peripheral/{dev_id}",
                                 property=prop)
        for tid, props in threads.items():
            for prop in props:
                got[f"{tid}.{prop}"] = vm.cmd("qom-get", path=f"/objects/{tid}",
                                              property=prop)
        vm.shutdown()
    except Exception as e:      # noqa: BLE001 -- reported below
        err = e
    finally:
        vm.shutdown(hard=True)
    expect = {k: v for k, (_, v) in want.items()}
    expect.update({f"{tid}.{p}": v for tid, props in threads.items() for p, v in props.items()})
    t.ok(err is None and vm.exitcode() == 0 and want and got == expect,
         f"libvirt example {name}: QEMU accepts its nvme controller, which runs in "
         f"{', '.join(sorted(threads)) or '(no IOThread!)'} with the <poll> settings",
         f"rc={vm.exitcode()} got={got} expected={expect} error={err}\n"
         f"log: {(vm.get_log() or '')[:500]}")


def main():
    qemu = sys.argv[1] if len(sys.argv) > 1 else \
        os.path.join(ROOT, "build/qemu/build/qemu-system-x86_64")
    t = Tap()
    for path in sorted(glob.glob(os.path.join(ROOT, "examples/libvirt/*.xml"))):
        with tempfile.TemporaryDirectory() as tmp:
            check(t, qemu, path, tmp)
    sys.exit(t.done())


if __name__ == "__main__":
    main()
