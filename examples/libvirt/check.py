#!/usr/bin/python3
"""Check the libvirt example against the patched QEMU (`make check`).

Starts QEMU (QEMUMachine) with the example's <qemu:commandline> arguments
(libvirt's IOThread "iothread1" replaced by an -object, the image by a
scratch file), asks over QMP whether the nvme device came up with its
iothread, and quits.  Prints TAP; exit status 1 on failure.

    PYTHONPATH=.:build/qemu/python python3 examples/libvirt/check.py [QEMU]
"""
import os
import sys
import tempfile
import xml.etree.ElementTree as ET

from qemu.machine import QEMUMachine

from nvdp import ROOT
from nvdp.tap import Tap

QNS = "{http://libvirt.org/schemas/domain/qemu/1.0}"


def main():
    qemu = sys.argv[1] if len(sys.argv) > 1 else \
        os.path.join(ROOT, "build/qemu/build/qemu-system-x86_64")
    dom = ET.parse(os.path.join(ROOT, "examples/libvirt/nvme-iothread.xml")).getroot()
    t = Tap()
    with tempfile.TemporaryDirectory() as tmp:
        img = os.path.join(tmp, "nvme0.raw")
        with open(img, "wb") as f:
            f.truncate(64 << 20)
        # cache.direct=on needs O_DIRECT, which tmpfs lacks
        args = [a.get("value").replace("/var/lib/libvirt/images/nvme0.raw", img)
                .replace('"cache":{"direct":true}', '"cache":{"direct":false}')
                .replace('"aio":"native"', '"aio":"threads"') for a in dom.iter(QNS + "arg")]
        vm = QEMUMachine(qemu, ["-machine", "q35", "-accel", "tcg", "-nodefaults", "-S",
                                "-object", "iothread,id=iothread1"] + args, base_temp_dir=tmp)
        got, err = None, None
        try:
            vm.launch()
            got = vm.cmd("qom-get", path="/machine/peripheral/nvme0", property="iothread")
            vm.shutdown()
        except Exception as e:      # noqa: BLE001 -- reported below
            err = e
        finally:
            vm.shutdown(hard=True)
        t.ok(err is None and vm.exitcode() == 0 and "iothread1" in str(got),
             "libvirt example: QEMU accepts the nvme arguments and the controller uses iothread1",
             f"rc={vm.exitcode()} qom-get={got} error={err}\nlog: {(vm.get_log() or '')[:500]}")
    sys.exit(t.done())


if __name__ == "__main__":
    main()
