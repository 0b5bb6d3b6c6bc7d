"""nvme-dataplane harness: configurations, guest boots, fio, TAP, reports.

Run from the repository root with QEMU's python package of the built tree
on the path; the Makefile sets it (PYTHONPATH=.:build/qemu/python):

    python3 -m nvdp.bench --help        the benchmark (make bench)
    python3 -m nvdp.configs --markdown  the table of configurations
    python3 -m nvdp.vm QEMU 'job'       one ad-hoc guest boot
"""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
