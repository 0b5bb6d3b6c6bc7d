#!/usr/bin/python3
"""Check the libvirt example against the patched QEMU (`make check`).

Starts QEMU with the example's <qemu:commandline> arguments (libvirt's
IOThread "iothread1" replaced by an -object, the image by a scratch file),
asks over QMP whether the nvme device came up with its iothread, and quits.
Prints `ok`/`not ok` lines; exit status 1 on failure.
"""
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
QNS = "{http://libvirt.org/schemas/domain/qemu/1.0}"


def main():
    qemu = sys.argv[1] if len(sys.argv) > 1 else \
        os.path.join(ROOT, "build/qemu/build/qemu-system-x86_64")
    dom = ET.parse(os.path.join(HERE, "nvme-iothread.xml")).getroot()
    args = [a.get("value") for a in dom.iter(QNS + "arg")]
    with tempfile.TemporaryDirectory() as tmp:
        img = os.path.join(tmp, "nvme0.raw")
        with open(img, "wb") as f:
            f.truncate(64 << 20)
        args = [a.replace("/var/lib/libvirt/images/nvme0.raw", img) for a in args]
        # cache.direct=on needs O_DIRECT, which tmpfs lacks
        args = [a.replace('"cache":{"direct":true}', '"cache":{"direct":false}')
                .replace('"aio":"native"', '"aio":"threads"') for a in args]
        cmd = [qemu, "-machine", "q35", "-accel", "tcg", "-nodefaults", "-display", "none",
               "-S", "-qmp", "stdio", "-object", "iothread,id=iothread1"] + args
        qmp = ['{"execute":"qmp_capabilities"}',
               '{"execute":"qom-get","arguments":{"path":"/machine/peripheral/nvme0",'
               '"property":"iothread"}}',
               '{"execute":"quit"}']
        p = subprocess.run(cmd, input="\n".join(qmp) + "\n", capture_output=True,
                           text=True, timeout=60)
    replies = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    got = [r.get("return") for r in replies if "return" in r]
    ok = p.returncode == 0 and len(got) >= 2 and "iothread1" in str(got[1])
    print(f"{'ok' if ok else 'not ok'} 1 - libvirt example: QEMU accepts the nvme "
          f"arguments and the controller uses iothread1")
    if not ok:
        print(f"#   rc={p.returncode} replies={replies} stderr={p.stderr.strip()[:500]}")
    print("1..1")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
